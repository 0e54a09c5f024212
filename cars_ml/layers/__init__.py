"""Custom Keras layers saved inside the product's models.

The layer that modeling builds into every classifier is the one serving loads, so it lives below
both: modeling and serving import it, and it imports nothing of the product.
"""
