using System.Collections.Immutable;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>
/// What a virtio-console model needs to continue after a restart: the host input it accepted and
/// has not yet put in a receive buffer, oldest first. Equality compares the bytes.
/// </summary>
public sealed record VirtioConsoleState(ImmutableArray<byte> PendingInput)
{
    public bool Equals(VirtioConsoleState? other) =>
        other is not null && PendingInput.AsSpan().SequenceEqual(other.PendingInput.AsSpan());

    public override int GetHashCode() => PendingInput.Length;
}

/// <summary>
/// virtio console device (virtio 1.2 §5.3), port 0 only: device ID 3, queue 0 receiveq (device to
/// driver), queue 1 transmitq (driver to device). No feature bits: not MULTIPORT (no control queues),
/// not EMERG_WRITE, not SIZE (§5.3.4 puts <c>rows</c> before <c>cols</c>; Linux kernels before commit
/// 5326ab737a47, Debian's 6.1 among them, read them the other way round, so one of the two would see the
/// size transposed). The 12-byte
/// configuration layout reads as zeroes (its fields are valid only with those features).
///
/// <list type="bullet">
/// <item>transmitq: the device-readable bytes of each chain, in chain order, go to the output sink;
/// the chain is returned with length 0 (§2.7.8: the device wrote nothing). Device-writable buffers in
/// a transmitq (§5.3.6.1: the driver MUST NOT) are ignored.</item>
/// <item>receiveq: host bytes given to <see cref="Input"/> are held (up to <see cref="MaxPendingInput"/>)
/// and written, in order, into the device-writable buffers of the receive chains the driver made
/// available; each chain is returned with the number of bytes written (§2.7.8). A chain is taken only
/// when there is input for it. A chain with no device-writable byte (§5.3.6.1: the driver MUST NOT) is
/// returned with length 0 and takes no input.</item>
/// </list>
/// <see cref="Input"/> does not touch guest memory: its owner calls the transport's NotifyQueue for
/// <see cref="ReceiveQueue"/> afterwards (when <see cref="HasPendingInput"/>), which runs
/// <see cref="Process"/> and sends the used-buffer notification. Host input beyond the bound is not
/// taken: <see cref="Input"/> returns how many bytes it took, and the host keeps the rest (stops
/// reading its source) until the driver posts buffers — backpressure, never a silent drop.
///
/// Restarts: the model holds no chain between two calls, so the used ring is the truth
/// (<see cref="SplitVirtqueue.FromState"/>). Input leaves the pending bytes only once its chain is on the
/// used ring, so none is lost or doubled. A transmit chain is put on the used ring right after its
/// bytes went to the sink; only an exception thrown by the sink itself (the model throws none) could
/// fail the model between the two, and that one chain would then be output again after the restart.
/// </summary>
/// <param name="memory">Guest memory of the buffers (the queue has checked they are RAM).</param>
/// <param name="output">Receives the bytes the driver transmits, in order, in pieces.</param>
public sealed class VirtioConsole(IGuestMemory memory, Action<ReadOnlySpan<byte>> output) : IVirtioDevice, IHostInput
{
    public const ushort VirtioDeviceId = 3;
    public const ushort QueueSize = 256;
    public const int ReceiveQueue = 0;
    public const int TransmitQueue = 1;
    /// <summary>Host input held while the driver has posted no receive buffer.</summary>
    public const int MaxPendingInput = 64 * 1024;
    /// <summary>Transmitted bytes go to the sink in pieces of at most this size.</summary>
    public const int OutputChunk = 4096;
    public const int ConfigSize = 12;

    private readonly Queue<byte> _pending = new();
    private readonly byte[] _chunk = new byte[OutputChunk];

    public ushort DeviceId => VirtioDeviceId;
    public ulong Features => 0;
    public IReadOnlyList<ushort> QueueMaxSizes { get; } = [QueueSize, QueueSize];
    public int ConfigLength => ConfigSize;

    /// <summary>Host input accepted and not yet in a receive buffer.</summary>
    public int PendingInput => _pending.Count;
    public bool HasPendingInput => _pending.Count > 0;

    public VirtioConsoleState State() => new([.. _pending]);

    /// <summary>Why <paramref name="state"/> cannot be restored (more pending input than the bound),
    /// or null.</summary>
    public static string? StateProblem(VirtioConsoleState state) =>
        state.PendingInput.IsDefault ? "pendingInput is missing"
        : state.PendingInput.Length > MaxPendingInput ? $"{state.PendingInput.Length} pending input bytes, more than {MaxPendingInput}"
        : null;

    public static VirtioConsole FromState(VirtioConsoleState state, IGuestMemory memory, Action<ReadOnlySpan<byte>> output)
    {
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        var console = new VirtioConsole(memory, output);
        foreach (var b in state.PendingInput) console._pending.Enqueue(b);
        return console;
    }

    /// <summary>Takes host input for the driver, as much as fits under <see cref="MaxPendingInput"/>;
    /// returns how many bytes it took (the caller keeps the rest and offers it again later).</summary>
    public int Input(ReadOnlySpan<byte> data)
    {
        var n = Math.Min(data.Length, MaxPendingInput - _pending.Count);
        foreach (var b in data[..n]) _pending.Enqueue(b);
        return n;
    }

    int IHostInput.OfferInput(ReadOnlySpan<byte> data) => Input(data);

    public ulong ReadConfig(ulong offset, int size) => 0;

    public void WriteConfig(ulong offset, int size, ulong value) { }

    /// <summary>The driver reset the device (§2.4): input not yet delivered is dropped with the queues
    /// it was meant for.</summary>
    public void Reset() => _pending.Clear();

    public void Process(int queue, SplitVirtqueue ring)
    {
        if (queue == TransmitQueue) Transmit(ring);
        else if (queue == ReceiveQueue) Receive(ring);
    }

    /// <summary>Sends every available transmit chain to the sink, in order, then asks for the next
    /// notification (re-checking the ring, §2.7.10).</summary>
    private void Transmit(SplitVirtqueue ring)
    {
        do
        {
            ring.DisableNotifications();
            while (ring.TryPop(out var chain))
            {
                Send(chain);
                if (!ring.Push(chain.Head, 0)) return;
            }
            if (ring.Error is not null) return;
        } while (ring.EnableNotifications());
    }

    private void Send(DescriptorChain chain)
    {
        foreach (var b in chain.Readable)
        {
            for (var done = 0U; done < b.Length;)
            {
                var piece = _chunk.AsSpan(0, (int)Math.Min((uint)_chunk.Length, b.Length - done));
                if (!memory.TryRead(b.Address + done, piece)) return;
                output(piece);
                done += (uint)piece.Length;
            }
        }
    }

    /// <summary>Fills receive chains while input is pending. With input left over and no chain, asks
    /// for the driver's next notification, so newly posted buffers bring this back.</summary>
    private void Receive(SplitVirtqueue ring)
    {
        while (true)
        {
            ring.DisableNotifications();
            while (_pending.Count > 0 && ring.TryPop(out var chain))
            {
                var (written, taken) = Fill(chain);
                if (!ring.Push(chain.Head, written)) return;
                for (var i = 0; i < taken; i++) _pending.Dequeue();
            }
            if (ring.Error is not null) return;
            if (!ring.EnableNotifications() || _pending.Count == 0) return;
        }
    }

    /// <summary>Writes pending input (without dequeuing it) into the chain's writable buffers; returns
    /// the bytes written and how many pending bytes they were.</summary>
    private (uint Written, int Taken) Fill(DescriptorChain chain)
    {
        var room = (int)Math.Min((ulong)_pending.Count, chain.WritableLength);
        if (room == 0) return (0, 0);
        var bytes = _pending.Take(room).ToArray();
        var written = 0;
        foreach (var b in chain.Writable)
        {
            var n = (int)Math.Min(b.Length, (uint)(room - written));
            if (n == 0) break;
            if (!memory.TryWrite(b.Address, bytes.AsSpan(written, n))) break;
            written += n;
        }
        return ((uint)written, written);
    }
}
