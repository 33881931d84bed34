"""Getting a trained model out: read any checkpoint layout (`trained`), write Hugging Face folders (`folders`)."""
