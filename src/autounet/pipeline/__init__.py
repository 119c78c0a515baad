"""The whole pipeline in one resumable command (`autounet run`) and the demo (`autounet demo`)."""
