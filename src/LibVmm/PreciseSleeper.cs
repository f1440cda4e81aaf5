using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>
/// A sleep with sub-millisecond precision that another thread can cut short: ppoll(2) on an
/// eventfd with a nanosecond timeout (.NET's own waits take whole milliseconds). For the one thread
/// that runs guest timers; <see cref="Wake"/> may come from any thread.
/// </summary>
public sealed unsafe class PreciseSleeper : IDisposable
{
    private int _fd;

    public PreciseSleeper()
    {
        _fd = NativeMemory.EventFd(0, NativeMemory.EFD_CLOEXEC | NativeMemory.EFD_NONBLOCK);
        if (_fd < 0) throw KvmException.Last("eventfd(sleeper)");
    }

    /// <summary>
    /// Sleeps until <paramref name="timeout"/> has passed (null: until woken) or <see cref="Wake"/>
    /// is called; a wake that came before the sleep ends it at once. Returns true if woken. A
    /// signal may end the sleep early (returns false): callers look at the clock, not at this.
    /// </summary>
    public bool Sleep(TimeSpan? timeout)
    {
        var fd = Volatile.Read(ref _fd);
        if (fd < 0) throw new ObjectDisposedException(nameof(PreciseSleeper));
        var pfd = new NativeMemory.PollFd { Fd = fd, Events = NativeMemory.POLLIN };
        int r;
        if (timeout is { } t)
        {
            var ticks = Math.Max(0, t.Ticks);
            var ts = new NativeMemory.Timespec { Seconds = ticks / TimeSpan.TicksPerSecond, Nanoseconds = ticks % TimeSpan.TicksPerSecond * 100 };
            // SAFETY: pfd and ts are locals that outlive the call; no signal mask is passed.
            r = NativeMemory.Ppoll(&pfd, 1, &ts, null);
        }
        else
        {
            r = NativeMemory.Ppoll(&pfd, 1, null, null);
        }
        if (r < 0)
        {
            var err = Marshal.GetLastPInvokeError();
            if (err == NativeMemory.EINTR) return false;
            throw new KvmException("ppoll(sleeper)", err);
        }
        if (r == 0 || (pfd.Revents & NativeMemory.POLLIN) == 0) return false;
        ulong count;
        // SAFETY: reads the eventfd's 8-byte counter into a local (non-blocking: EAGAIN if a racing sleep drained it).
        NativeMemory.Read(fd, &count, 8);
        return true;
    }

    /// <summary>Ends the current (or the next) <see cref="Sleep"/>. Any thread.</summary>
    public void Wake()
    {
        var fd = Volatile.Read(ref _fd);
        if (fd < 0) return;
        ulong one = 1;
        // SAFETY: writes 8 bytes from a local to the eventfd (non-blocking).
        NativeMemory.Write(fd, &one, 8);
    }

    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0) Native.Close(fd);
    }
}
