"""`make bench`: the service's performance, each figure against a floor measured in the same run."""
