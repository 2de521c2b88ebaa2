"""What every stage shares and no stage owns: the kinds of dictionary a sweep trains (kinds) and
the names a config field may choose from (choices)."""
