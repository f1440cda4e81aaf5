using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>
/// virtio entropy device (virtio 1.2 §5.4): device ID 4, one queue (requestq), no feature bits, no
/// configuration space. For each chain the driver makes available, the device fills its writable
/// buffers with bytes from the host entropy source and returns the chain with the number of bytes
/// written (§5.4.6.1: it MUST NOT return more than the buffer holds; it may return fewer). A chain with
/// readable buffers only is returned with length 0 (§5.4.6.1: the device reads nothing).
///
/// Up to <see cref="MaxBytesPerChain"/> bytes go into one chain, so a driver's huge buffer cannot make
/// the host draw unbounded entropy in one notification; the driver asks again for the rest.
/// </summary>
/// <param name="memory">Guest memory the buffers are written through (already checked to be RAM).</param>
/// <param name="entropy">Fills its argument with random bytes (the host's entropy source).</param>
public sealed class VirtioRng(IGuestMemory memory, Action<Span<byte>> entropy) : IVirtioDevice
{
    public const ushort VirtioDeviceId = 4;
    public const ushort QueueSize = 256;
    public const int MaxBytesPerChain = 64 * 1024;

    public ushort DeviceId => VirtioDeviceId;
    public ulong Features => 0;
    public IReadOnlyList<ushort> QueueMaxSizes { get; } = [QueueSize];
    public int ConfigLength => 0;

    public ulong ReadConfig(ulong offset, int size) => 0;

    public void WriteConfig(ulong offset, int size, ulong value) { }

    public void Reset() { }

    /// <summary>Completes every available chain of the request queue, in order, then asks for the next
    /// notification (re-checking the ring, §2.7.10).</summary>
    public void Process(int queue, SplitVirtqueue ring)
    {
        if (queue != 0) return;
        do
        {
            ring.DisableNotifications();
            while (ring.TryPop(out var chain))
                if (!ring.Push(chain.Head, Fill(chain))) return;
            if (ring.Error is not null) return;
        } while (ring.EnableNotifications());
    }

    private uint Fill(DescriptorChain chain)
    {
        var budget = MaxBytesPerChain;
        var written = 0;
        var buffer = new byte[Math.Min((ulong)budget, chain.WritableLength)];
        foreach (var b in chain.Writable)
        {
            var n = (int)Math.Min(b.Length, (uint)(budget - written));
            if (n == 0) break;
            var part = buffer.AsSpan(written, n);
            entropy(part);
            if (!memory.TryWrite(b.Address, part)) break;
            written += n;
        }
        return (uint)written;
    }
}
