"""Data package (Note [Packaged resources] in mtldsl/resources.py): the paper specs the wheel ships inside mtldsl/."""
