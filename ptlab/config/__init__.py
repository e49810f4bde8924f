"""The structured-config schemas that validate every group of conf/, and the one way to compose conf/ outside `ptlab-train`."""
