"""Data: datasets' records, text, the CNN backbone, feature stores, GloVe, tf.data."""
