"""Video files: decoding clips and image sequences, encoding with VideoHelperSuite-style formats."""
