"""Ray glue: the only part of ctal that imports ray."""
