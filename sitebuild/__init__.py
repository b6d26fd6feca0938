"""Build machinery for the site: snippet pages, math rendering, assets."""
