using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

// The VM-wide KVM state a snapshot saves: the kvmclock.
public sealed unsafe partial class VmHandle
{
    /// <summary>
    /// KVM_GET_CLOCK: the VM's kvmclock (ns) with the host's CLOCK_REALTIME of the same instant: KVM's
    /// own pairing when it gives one (KVM_CLOCK_REALTIME, when the host's clocksource is the TSC), else
    /// a read of CLOCK_REALTIME right after the ioctl.
    /// </summary>
    public VmKvmState SaveClock()
    {
        var data = GetClock();
        var realtime = (data.Flags & KvmClockData.RealtimeValid) != 0 ? (long)data.Realtime : ClockNative.RealtimeNs();
        return new VmKvmState(data.Clock, data.Flags, realtime,
            (data.Flags & KvmClockData.HostTscValid) != 0 ? data.HostTsc : null);
    }

    /// <summary>
    /// KVM_SET_CLOCK from a saved <paramref name="state"/>. Call it before the vcpus'
    /// <see cref="VcpuHandle.RestoreState"/>: a host write of MSR_KVM_WALL_CLOCK_NEW makes KVM write
    /// the guest's wall-clock page as host realtime minus the VM's kvmclock of that moment, so the
    /// kvmclock must already be the restored one.
    /// Guest time never goes backwards: the clock is the saved one, plus, when
    /// <paramref name="bringWallClockToNow"/>, the host realtime elapsed since the save, so the wall
    /// clock a guest derives from kvmclock (boot wall time + kvmclock) is the host's time again.
    /// With KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK lists it) KVM adds the elapsed time itself at
    /// the moment it sets the clock (never a negative step); without it, the same sum is made here
    /// (<see cref="VmKvmState.ClockAt"/>) a few microseconds earlier. Without
    /// <paramref name="bringWallClockToNow"/> the clock continues from its saved value, as if the VM
    /// had been paused. The TSC is per vcpu: it continues from its saved value (see
    /// <see cref="VcpuHandle.RestoreState"/>) either way.
    /// </summary>
    public void RestoreClock(VmKvmState state, bool bringWallClockToNow)
    {
        ArgumentNullException.ThrowIfNull(state);
        var data = new KvmClockData { Clock = state.Clock };
        if (bringWallClockToNow && (_kvm.CheckExtension(KvmCap.AdjustClock) & KvmClockData.RealtimeValid) != 0)
        {
            data.Flags = KvmClockData.RealtimeValid;
            data.Realtime = (ulong)state.RealtimeNs;
        }
        else
        {
            data.Clock = state.ClockAt(ClockNative.RealtimeNs(), bringWallClockToNow);
        }
        // SAFETY: a local of the 48-byte struct kvm_clock_data the ioctl number encodes; KVM only reads it.
        if (Native.Ioctl(_fd, KvmStateIoctl.SetClock, &data) < 0) throw KvmException.Last($"KVM_SET_CLOCK(clock {data.Clock} ns)");
    }

    /// <summary>KVM_GET_CLOCK as KVM gives it.</summary>
    public KvmClockData GetClock()
    {
        KvmClockData data;
        // SAFETY: a local of the 48-byte struct kvm_clock_data the ioctl number encodes; KVM writes all of it.
        if (Native.Ioctl(_fd, KvmStateIoctl.GetClock, &data) < 0) throw KvmException.Last("KVM_GET_CLOCK");
        return data;
    }
}

/// <summary>clock_gettime(CLOCK_REALTIME), in ns since the Unix epoch.</summary>
internal static unsafe partial class ClockNative
{
    private const int ClockRealtime = 0;

    [StructLayout(LayoutKind.Sequential)]
    private struct Timespec
    {
        public long Seconds, Nanoseconds;
    }

    [LibraryImport("libc", EntryPoint = "clock_gettime", SetLastError = true)]
    private static partial int ClockGettime(int clock, Timespec* time);

    public static long RealtimeNs()
    {
        Timespec t;
        // SAFETY: a local struct timespec (16 bytes on x86-64) that the call fills.
        if (ClockGettime(ClockRealtime, &t) < 0) throw new KvmException("clock_gettime(CLOCK_REALTIME)", Marshal.GetLastPInvokeError());
        return t.Seconds * 1_000_000_000 + t.Nanoseconds;
    }
}
