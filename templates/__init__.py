"""Data package (Note [Packaged resources] in mtldsl/resources.py): the Jinja templates of the generated module the wheel ships inside mtldsl/."""
