"""Starting the ranks of a job: ``megalite launch`` (:mod:`.main`), its backends
(:mod:`.runners`), the per-node launcher (:mod:`.local`) and the hostfile (:mod:`.hostfile`)."""
