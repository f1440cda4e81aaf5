using System.Buffers.Binary;
using System.Globalization;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>Offloads the host may use in the frames it gives a virtio-net device: what the driver
/// negotiated of VIRTIO_NET_F_GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6 (virtio 1.2 §5.1.3).</summary>
[Flags]
public enum NetOffloads
{
    None = 0,
    /// <summary>Frames may carry a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM) or be marked DATA_VALID.</summary>
    Checksum = 0b001,
    /// <summary>Frames may be TCPv4 segmentation-offload frames (VIRTIO_NET_HDR_GSO_TCPV4).</summary>
    Tso4 = 0b010,
    /// <summary>Frames may be TCPv6 segmentation-offload frames (VIRTIO_NET_HDR_GSO_TCPV6).</summary>
    Tso6 = 0b100,
}

/// <summary>
/// The host side of a virtio-net device: a link carrying Ethernet frames, each preceded by the 12-byte
/// virtio 1.x <c>struct virtio_net_hdr</c> (virtio 1.2 §5.1.6: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers; little-endian), in both directions. Non-blocking: nothing here
/// waits. A host failure on one frame is a dropped frame (a return value); only a backend that can no
/// longer work at all throws.
/// </summary>
public interface INetBackend : IDisposable
{
    /// <summary>Sends one frame: <c>virtio_net_hdr</c> (its num_buffers ignored) then the Ethernet
    /// frame. False if the host refused it (the frame is lost, as on a wire).</summary>
    bool Send(ReadOnlySpan<byte> headerAndFrame);

    /// <summary>Copies the next frame the host has for the guest (header, then frame) into
    /// <paramref name="buffer"/>; returns its length, 0 if there is none. A frame longer than the buffer is
    /// cut to it and its full length returned, so a result above buffer.Length means "too long".</summary>
    int TryReceive(Span<byte> buffer);

    /// <summary>The offloads the frames from <see cref="TryReceive"/> may use from now on; the host
    /// finishes checksums and segments itself for the others.</summary>
    void SetReceiveOffloads(NetOffloads offloads);
}

/// <summary>
/// A TAP interface as the backend (Linux Documentation/networking/tuntap.rst): its vnet header is the
/// virtio 1.x one (TUNSETVNETHDRSZ 12), so headers pass through unchanged, and
/// <see cref="SetReceiveOffloads"/> is TUNSETOFFLOAD (GUEST_CSUM → TUN_F_CSUM, GUEST_TSO4 →
/// TUN_F_TSO4, GUEST_TSO6 → TUN_F_TSO6). The owner polls <see cref="Tap"/>'s fd to learn that frames
/// arrived.
/// </summary>
public sealed class TapNetBackend(TapDevice tap) : INetBackend
{
    public TapDevice Tap { get; } = tap;

    /// <summary>Opens (creating if needed) TAP <paramref name="name"/>; <see cref="TapException"/> says
    /// why it cannot.</summary>
    public static TapNetBackend Open(string name) => new(TapDevice.Open(name));

    public bool Send(ReadOnlySpan<byte> headerAndFrame) => Tap.Write(headerAndFrame) == 0;

    public int TryReceive(Span<byte> buffer) => Tap.Read(buffer);

    public void SetReceiveOffloads(NetOffloads offloads) =>
        Tap.SetOffloads(
            (offloads.HasFlag(NetOffloads.Checksum) ? TapOffloads.Csum : 0)
            | (offloads.HasFlag(NetOffloads.Tso4) ? TapOffloads.Tso4 : 0)
            | (offloads.HasFlag(NetOffloads.Tso6) ? TapOffloads.Tso6 : 0));

    public void Dispose() => Tap.Dispose();
}

/// <summary>A 48-bit Ethernet MAC address, first octet in the high byte of <see cref="Value"/>.</summary>
public readonly record struct MacAddress(ulong Value)
{
    public const int Length = 6;

    /// <summary>The I/G bit of the first octet: a group (multicast) address.</summary>
    public bool IsMulticast => (Value >> 40 & 0b01) != 0;

    /// <summary>The U/L bit of the first octet: a locally administered address (IEEE 802 §8.2).</summary>
    public bool IsLocallyAdministered => (Value >> 40 & 0b10) != 0;

    public static MacAddress FromBytes(ReadOnlySpan<byte> b) =>
        new(b.Length == Length ? (ulong)BinaryPrimitives.ReadUInt16BigEndian(b) << 32 | BinaryPrimitives.ReadUInt32BigEndian(b[2..])
            : throw new ArgumentException($"a MAC address has {Length} bytes, not {b.Length}"));

    public void CopyTo(Span<byte> b)
    {
        BinaryPrimitives.WriteUInt16BigEndian(b, (ushort)(Value >> 32));
        BinaryPrimitives.WriteUInt32BigEndian(b[2..], (uint)Value);
    }

    /// <summary>A random unicast, locally administered address (first octet xxxxxx10).</summary>
    public static MacAddress GenerateLocal(Random random)
    {
        Span<byte> b = stackalloc byte[Length];
        random.NextBytes(b);
        b[0] = (byte)(b[0] & 0b1111_1100 | 0b10);
        return FromBytes(b);
    }

    /// <summary>"52:54:00:12:34:56" (or with '-'); false for anything else.</summary>
    public static bool TryParse(string? text, out MacAddress mac)
    {
        mac = default;
        if (text is null || text.Length != 17) return false;
        ulong v = 0;
        for (var i = 0; i < Length; i++)
        {
            if (i > 0 && text[3 * i - 1] is not (':' or '-')) return false;
            if (!byte.TryParse(text.AsSpan(3 * i, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var octet))
                return false;
            v = v << 8 | octet;
        }
        mac = new MacAddress(v);
        return true;
    }

    public override string ToString()
    {
        Span<byte> b = stackalloc byte[Length];
        CopyTo(b);
        return string.Create(CultureInfo.InvariantCulture, $"{b[0]:x2}:{b[1]:x2}:{b[2]:x2}:{b[3]:x2}:{b[4]:x2}:{b[5]:x2}");
    }
}
