"""chatforge.plan"""
