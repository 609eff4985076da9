"""Reading requests from files and writing results to them."""
