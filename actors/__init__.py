"""rayalign's Ray actors: the group abstraction and one module per role."""
