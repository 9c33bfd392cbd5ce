"""The sync engine, in pipeline order: client -> walk -> extract -> models -> normalize ->
staging -> load, orchestrated by ``sync``."""
