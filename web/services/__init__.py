"""What the routes call: the job service, the batch service, prompt token counts, chat templates. No route module is imported here."""
