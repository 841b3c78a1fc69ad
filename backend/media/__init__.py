"""Task images fetched from wherever Label Studio says they live (allow-listed schemes, an
SSRF guard, Label Studio's own auth), through a disk cache shared by processes."""
