"""Work nobody waits on in the request: submitted jobs, files and batches."""
