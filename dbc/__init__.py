"""DBC files and signal maps shipped with bmsgw (package data)."""
