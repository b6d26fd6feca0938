"""Snippet modules: each one is a page of the site and a module the tests import."""
