"""chatforge.losses"""
