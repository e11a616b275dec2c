"""PEFT tuners shipped by peft-graft."""
