//! Work that a prompt exit must not cut short.
//!
//! The CLI's first Ctrl-C asks a run to stop once the steps under way are done, and a second exits
//! at once. "At once" must not fall inside a file's write (a checkpoint saved after the
//! first interrupt would be lost, a temporary file left behind) or inside the move of a
//! study's outputs into place (half of them moved). Such work holds a [`Critical`] section,
//! and [`exit_when_safe`] waits for every section held to end, and lets no new one begin,
//! before it exits (the CLI's third Ctrl-C exits even then: a write hung on a network file
//! system must not take every other way out).

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The sections held, and whether an exit is under way (then none may begin).
struct Sections {
    held: AtomicUsize,
    closing: AtomicBool,
}

impl Sections {
    const fn new() -> Self {
        Sections { held: AtomicUsize::new(0), closing: AtomicBool::new(false) }
    }

    /// Holds a section for a thread that holds `depth` already; once an exit is under way,
    /// blocks the caller until the process ends, unless the section is nested in one the
    /// caller holds (the exit waits for that one, so it must be let finish: the move of a
    /// study's outputs writes files).
    fn enter(&self, depth: &Cell<usize>) {
        let nested = depth.get() > 0;
        self.held.fetch_add(1, Ordering::SeqCst);
        // Either the exit sees this section held and waits for it, or this sees the exit
        // under way and gives the section up (both flags are sequentially consistent).
        if !nested && self.closing.load(Ordering::SeqCst) {
            self.held.fetch_sub(1, Ordering::SeqCst);
            loop {
                std::thread::park();
            }
        }
        depth.set(depth.get() + 1);
    }

    fn leave(&self, depth: &Cell<usize>) {
        depth.set(depth.get().saturating_sub(1));
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    /// Lets no section begin from now on, then waits until none is held.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        while self.held.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst) > 0
    }
}

static SECTIONS: Sections = Sections::new();

thread_local! {
    /// Sections the calling thread holds.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Sections the calling thread has entered in all (what tests of the callers count).
    static ENTERED: Cell<u64> = const { Cell::new(0) };
}

/// A section [`exit_when_safe`] waits for: from [`Critical::enter`] until the guard drops,
/// on the same thread (the guard cannot be sent: the nesting is counted per thread).
#[must_use = "the section ends when the guard drops"]
pub struct Critical(PhantomData<*const ()>);

impl Critical {
    /// Holds a section. Called while an exit is under way, it never returns (the process
    /// ends first), unless the calling thread holds a section already.
    pub fn enter() -> Self {
        DEPTH.with(|depth| SECTIONS.enter(depth));
        ENTERED.set(ENTERED.get() + 1);
        Critical(PhantomData)
    }
}

impl Drop for Critical {
    fn drop(&mut self) {
        DEPTH.with(|depth| SECTIONS.leave(depth));
    }
}

/// How many sections the calling thread has entered since it began: a test of a caller
/// checks that its work held one.
#[doc(hidden)]
pub fn sections_entered_on_this_thread() -> u64 {
    ENTERED.get()
}

/// Whether some work holds a section now.
pub fn critical_work_running() -> bool {
    SECTIONS.is_held()
}

/// Exits the process with `code` once no section is held, letting none begin meanwhile.
/// Called from another thread than the work's (the Ctrl-C handler's).
pub fn exit_when_safe(code: i32) -> ! {
    SECTIONS.close();
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Polls `done` for up to a second.
    fn becomes(done: impl Fn() -> bool) -> bool {
        (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(1));
            done()
        })
    }

    /// Closing waits for the section held to end, and for one nested in it that begins
    /// meanwhile; a section asked for after that, not nested, never begins.
    #[test]
    fn closing_waits_for_held_sections_and_admits_no_new_one() {
        let sections = Arc::new(Sections::new());
        let depth = Cell::new(0);
        sections.enter(&depth);
        assert_eq!(depth.get(), 1);
        let closed = Arc::new(AtomicBool::new(false));
        let closer = {
            let (sections, closed) = (Arc::clone(&sections), Arc::clone(&closed));
            std::thread::spawn(move || {
                sections.close();
                closed.store(true, Ordering::SeqCst);
            })
        };
        assert!(becomes(|| sections.closing.load(Ordering::SeqCst)));
        // The holder's own nested section (a file written in the move) still begins: its
        // depth says it is nested.
        sections.enter(&depth);
        assert_eq!(depth.get(), 2);
        sections.leave(&depth);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!closed.load(Ordering::SeqCst), "closed while a section was held");
        sections.leave(&depth);
        assert_eq!(depth.get(), 0);
        closer.join().unwrap();
        assert!(closed.load(Ordering::SeqCst));
        // A section asked for now by a thread that holds none: it stays blocked (left parked
        // when the test ends).
        let (started, entered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        {
            let (sections, started, entered) = (Arc::clone(&sections), Arc::clone(&started), Arc::clone(&entered));
            std::thread::spawn(move || {
                started.store(true, Ordering::SeqCst);
                sections.enter(&Cell::new(0));
                entered.store(true, Ordering::SeqCst);
            });
        }
        assert!(becomes(|| started.load(Ordering::SeqCst)), "the thread never ran");
        assert!(!becomes(|| entered.load(Ordering::SeqCst)), "a section began after the close");
        assert!(!sections.is_held(), "the refused section is not counted as held");
    }

    /// The process-wide guard counts while it lives, a guard taken inside it is nested, and
    /// the thread's count of sections entered grows by each.
    #[test]
    fn a_guard_holds_its_section_until_dropped() {
        let entered = sections_entered_on_this_thread();
        let guard = Critical::enter();
        assert!(critical_work_running());
        assert_eq!(DEPTH.get(), 1);
        let inner = Critical::enter();
        assert_eq!(DEPTH.get(), 2);
        drop(inner);
        drop(guard);
        assert_eq!(DEPTH.get(), 0);
        assert_eq!(sections_entered_on_this_thread(), entered + 2);
    }
}
