"""Serving: a Ray-free ranker over an exported bundle and thin Ray Serve deployments.

Never imports training/ or parallel/: a replica loads an artifact, not training code.
"""
