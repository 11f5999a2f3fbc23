"""chatforge.data"""
