"""Test data: golden files and the script that writes them. A package, so that
`data.make_segmentation_golden` imports ahead of any installed module named `data`."""
