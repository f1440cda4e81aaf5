using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>
/// Which guest-physical ranges a virtio device may touch: a buffer the device reads must lie in
/// backed memory, a buffer it writes in RAM (not in a read-only firmware range, which
/// <see cref="IGuestMemory.TryWrite"/> would let a loader write). A range may span adjacent
/// segments. The ranges are taken once: the memory map of a running VM does not change.
/// </summary>
public sealed class GuestRam(IGuestMemory memory)
{
    private readonly GuestRange[] _ranges = memory.Ranges.OrderBy(r => r.Base.Value).ToArray();

    public IGuestMemory Memory { get; } = memory;

    /// <summary>Whether [<paramref name="address"/>, +<paramref name="length"/>) is backed (and writable
    /// RAM if <paramref name="writable"/>). A length of 0 is inside if its address is; a range that wraps
    /// past 2^64 never is.</summary>
    public bool Contains(GuestPhysAddr address, ulong length, bool writable)
    {
        var a = address.Value;
        var end = a + length;
        if (end < a) return false;
        if (length == 0) end = a + 1;
        if (end < a) return false;
        while (a < end)
        {
            var found = false;
            foreach (var r in _ranges)
            {
                if (a < r.Base.Value || a - r.Base.Value >= r.Size) continue;
                if (writable && r.ReadOnly) return false;
                if (r.End <= a) return true; // the range reaches the top of the address space
                a = r.End;
                found = true;
                break;
            }
            if (!found) return false;
        }
        return true;
    }
}
