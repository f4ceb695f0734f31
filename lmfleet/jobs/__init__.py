"""Work that outlives one call: batch journals, and the Batch API's files and jobs."""
