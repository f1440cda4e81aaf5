using System.Diagnostics;
using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary>The kick signal: installed with a handler, above the runtime's real-time signals, and
/// it interrupts a blocking system call on the target thread without killing the process.</summary>
public sealed unsafe class KickSignalTests
{
    private const int SaRestart = 0x1000_0000;

    [Fact]
    public void EnsureInstalled_leaves_a_ret_stub_as_the_handler()
    {
        KickSignal.EnsureInstalled();

        Native.SigAction old;
        Assert.Equal(0, Native.Sigaction(KickSignal.Signal, null, &old));

        Assert.NotEqual(0, old.Handler); // not SIG_DFL, which would kill the process
        Assert.NotEqual(1, old.Handler); // not SIG_IGN, which would not interrupt KVM_RUN
        Assert.Equal(0xC3, Marshal.ReadByte(old.Handler)); // ret
        Assert.Equal(SaRestart, old.Flags & SaRestart);
    }

    [Fact]
    public void The_signal_is_above_the_runtimes_real_time_signals()
    {
        Assert.True(KickSignal.Signal >= Native.CurrentSigRtMin() + 5,
            $"kick signal {KickSignal.Signal}, SIGRTMIN {Native.CurrentSigRtMin()}");
        Assert.True(KickSignal.Signal <= TestNative.CurrentSigRtMax(),
            $"kick signal {KickSignal.Signal}, SIGRTMAX {TestNative.CurrentSigRtMax()}");
    }

    [Fact]
    public void A_kick_interrupts_a_blocking_call_on_the_target_thread()
    {
        const int timeoutMs = 5000;
        using var started = new ManualResetEventSlim();
        var tid = 0;
        int result = 0, errno = 0;
        var elapsed = TimeSpan.Zero;
        var sleeper = new Thread(() =>
        {
            tid = KickSignal.CurrentThreadId();
            started.Set();
            var clock = Stopwatch.StartNew();
            result = TestNative.Poll(0, 0, timeoutMs);
            errno = Marshal.GetLastPInvokeError();
            elapsed = clock.Elapsed;
        }) { IsBackground = true, Name = "kick target" };
        sleeper.Start();
        started.Wait();

        // A kick that lands before the thread is inside poll() is absorbed by the handler, so kick
        // until it returns; poll() returns by itself after its timeout if kicks do nothing.
        var kicks = 0;
        while (!sleeper.Join(20))
        {
            Assert.True(KickSignal.SendTo(tid), "tgkill failed");
            kicks++;
        }

        Assert.True(kicks > 0);
        Assert.Equal(-1, result);
        Assert.Equal(Native.EINTR, errno);
        Assert.True(elapsed < TimeSpan.FromMilliseconds(timeoutMs), $"poll() ran its full {elapsed}: not interrupted");
    }

    [Fact]
    public void The_current_thread_id_is_the_kernel_tid_of_that_thread()
    {
        var tid = 0;
        var other = new Thread(() => tid = KickSignal.CurrentThreadId());
        other.Start();
        other.Join();

        Assert.NotEqual(0, tid);
        Assert.NotEqual(KickSignal.CurrentThreadId(), tid);
        Assert.True(Directory.Exists($"/proc/self/task/{KickSignal.CurrentThreadId()}"));
    }
}
