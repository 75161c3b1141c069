"""sparsediff.apps"""
