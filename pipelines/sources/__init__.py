"""Raw-data readers: each plans its sequences (`plan`) and loads one (`load`) as a `RawSequence`."""
