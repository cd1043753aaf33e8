"""`retrieval serve`: a long-lived search server over one collection (engine, micro-batcher, HTTP app, web page)."""
