"""Ray actors: thin shells over the Ray-free parts (learners, FedAvg math, the tracking hub)."""
