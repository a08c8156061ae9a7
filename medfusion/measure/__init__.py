"""Lesions and their numbers: `lesions` (the one lesion definition and each lesion's findings) and
`features` (the measurements the diagnosis reads off a label map)."""
