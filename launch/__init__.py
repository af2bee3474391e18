"""kiln.launch"""
