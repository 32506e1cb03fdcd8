"""Where work runs: the local executor lives beside the scorer (clipguard.scoring.run); others here."""
