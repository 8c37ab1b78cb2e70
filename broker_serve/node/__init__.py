"""A worker node: registers its capacity and supervises the replica processes assigned to it."""
