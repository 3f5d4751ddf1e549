"""De-identification: PS3.15 Annex E profiles with consistent pseudonyms, and export operations."""
