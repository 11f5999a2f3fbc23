"""chatforge.serve"""
