"""Sources of changed extents between two snapshots of one volume."""
