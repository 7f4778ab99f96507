"""Framework-facing base classes users subclass (the reference's ``amct_pytorch.common``)."""
