"""Data package (Note [Packaged resources] in mtldsl/resources.py): the grammar the wheel ships inside mtldsl/."""
