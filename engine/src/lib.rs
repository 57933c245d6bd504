//! Spate storage engine. (skeleton: the engine branch replaces this)
