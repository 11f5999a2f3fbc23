"""chatforge.rl"""
