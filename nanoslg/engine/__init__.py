"""The engine: requests, the async loop over the scheduler and an executor, output processing (the
one home of stop handling), detokenization, request streams, and the builder that assembles it."""
