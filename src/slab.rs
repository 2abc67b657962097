//! A vector with reusable slots, for the executor's in-flight files and directories (indices travel as job tags).

pub struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slab<T> {
    pub fn new() -> Self {
        Slab { entries: Vec::new(), free: Vec::new() }
    }

    pub fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(value);
                i
            }
            None => {
                self.entries.push(Some(value));
                self.entries.len() - 1
            }
        }
    }

    /// The live entry at `i`. Panics on a stale index: that is a bookkeeping bug, not a user error.
    pub fn get_mut(&mut self, i: usize) -> &mut T {
        self.entries[i].as_mut().expect("live slab entry")
    }

    pub fn remove(&mut self, i: usize) -> T {
        let v = self.entries[i].take().expect("live slab entry");
        self.free.push(i);
        v
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_reused() {
        let mut s = super::Slab::new();
        let a = s.insert(1);
        let b = s.insert(2);
        assert_eq!(s.remove(a), 1);
        let c = s.insert(3);
        assert_eq!(c, a);
        *s.get_mut(b) += 10;
        assert_eq!(s.remove(b), 12);
    }
}
