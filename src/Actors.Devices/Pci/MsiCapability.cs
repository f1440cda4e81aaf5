namespace ActorVmm.Devices.Pci;

/// <summary>A message-signalled interrupt as the function writes it (PCI Local Bus 3.0 §6.8): the
/// dword <see cref="Data"/> to the guest-physical <see cref="Address"/> (on x86 an address in
/// 0xFEExxxxx, decoded by the local APICs, Intel SDM Vol 3A §11.11).</summary>
public readonly record struct MsiMessage(ulong Address, uint Data);

/// <summary>
/// The MSI capability (ID 05h, PCI Local Bus 3.0 §6.8.1) with a 64-bit address and per-vector
/// masking, laid out as §6.8.1 figure 6-9 shows:
/// <code>
/// +0x00 ID, next   +0x02 Message Control   +0x04 Message Address   +0x08 Message Upper Address
/// +0x0C Message Data (16 bits; 16 reserved)   +0x10 Mask Bits   +0x14 Pending Bits
/// </code>
/// (without <c>address64</c> the upper address is absent and the rest moves up 4 bytes).
/// Message Control (§6.8.1.3): bit 0 MSI enable and bits 6:4 Multiple Message Enable are
/// writable; bits 3:1 Multiple Message Capable (log2 of <c>vectors</c>), bit 7 64-bit capable and bit
/// 8 per-vector masking capable are read-only. Address bits 1:0 read 0 (dword aligned, §6.8.1.4).
/// Mask bits of allocated-or-not vectors below <c>vectors</c> are writable; pending bits are
/// read-only (§6.8.1.8).
///
/// <see cref="Signal"/>: with MSI disabled, the function's bus mastering disabled (Command bit 2:
/// the message is a memory write the function cannot issue, §6.2.2) or a vector beyond the number
/// enabled, nothing is sent. A masked vector sets its pending bit instead (§6.8.1.7); when software
/// clears the mask (or enables MSI again) a pending vector is sent and its pending bit cleared.
/// With n = 2^MME vectors enabled, vector v is sent as Message Data with its low log2(n) bits
/// replaced by v (§6.8.1.6). MME above MMC is undefined; it is taken as MMC.
/// </summary>
public sealed class MsiCapability
{
    public const byte CapabilityId = 0x05;

    public const ushort ControlEnable = 0b0000_0000_0001;
    private const int MultipleMessageCapableShift = 1;
    private const int MultipleMessageEnableShift = 4;
    private const ushort ControlMultipleMessageEnable = 0b0111_0000;
    public const ushort Control64Bit = 0b0000_1000_0000;
    public const ushort ControlPerVectorMask = 0b0001_0000_0000;

    private readonly PciConfigSpace _config;
    private readonly Action<MsiMessage> _deliver;
    private readonly int _mmc; // log2 of the vectors the function can use
    private readonly int _dataOffset;
    private readonly int _maskOffset;
    private readonly int _pendingOffset;
    private readonly bool _address64;

    /// <param name="config">the function's configuration space; the capability is added to its list</param>
    /// <param name="vectors">1, 2, 4, 8, 16 or 32 (Multiple Message Capable)</param>
    /// <param name="deliver">sends a message (to the local APICs); called from Signal and from config writes</param>
    /// <param name="address64">whether the capability has the Message Upper Address (bit 7 of Message Control)</param>
    public MsiCapability(PciConfigSpace config, int vectors, Action<MsiMessage> deliver, bool address64 = true)
    {
        if (!int.IsPow2(vectors) || vectors > 32) throw new ArgumentOutOfRangeException(nameof(vectors), "1, 2, 4, 8, 16 or 32");
        _config = config;
        _deliver = deliver;
        _address64 = address64;
        _mmc = int.Log2(vectors);
        Offset = config.AddCapability(CapabilityId, address64 ? 0x18 : 0x14);
        config.DefineRegister(ControlOffset, 2,
            (uint)(_mmc << MultipleMessageCapableShift) | (address64 ? Control64Bit : 0u) | ControlPerVectorMask,
            ControlEnable | ControlMultipleMessageEnable);
        config.DefineRegister(Offset + 4, 4, 0, 0xFFFF_FFFC);
        if (address64)
            config.DefineRegister(Offset + 8, 4, 0, 0xFFFF_FFFF);
        _dataOffset = Offset + (address64 ? 0x0C : 0x08);
        config.DefineRegister(_dataOffset, 4, 0, 0xFFFF);
        _maskOffset = _dataOffset + 4;
        _pendingOffset = _maskOffset + 4;
        var vectorBits = vectors == 32 ? uint.MaxValue : (1u << vectors) - 1;
        config.DefineRegister(_maskOffset, 4, 0, vectorBits);
        config.DefineRegister(_pendingOffset, 4, 0, 0);
        config.AddIntxSuppressor(() => Enabled);
        config.Written += (offset, length) =>
        {
            if (offset < _pendingOffset && offset + length > ControlOffset) SendUnmaskedPending();
        };
    }

    /// <summary>The capability's offset in configuration space.</summary>
    public int Offset { get; }

    private int ControlOffset => Offset + 2;

    private ushort Control => (ushort)_config.Get(ControlOffset, 2);

    public bool Enabled => (Control & ControlEnable) != 0;

    /// <summary>The vectors software enabled: 2^MME, at most the capable count.</summary>
    public int EnabledVectors => 1 << Math.Min((Control & ControlMultipleMessageEnable) >> MultipleMessageEnableShift, _mmc);

    public uint MaskBits => _config.Get(_maskOffset, 4);

    public uint PendingBits => _config.Get(_pendingOffset, 4);

    /// <summary>The message vector <paramref name="vector"/> is sent as, now.</summary>
    public MsiMessage Message(int vector)
    {
        var address = (ulong)_config.Get(Offset + 4, 4);
        if (_address64) address |= (ulong)_config.Get(Offset + 8, 4) << 32;
        var n = (uint)EnabledVectors;
        var data = (_config.Get(_dataOffset, 2) & ~(n - 1)) | ((uint)vector & (n - 1));
        return new MsiMessage(address, data);
    }

    /// <summary>The device's interrupt for <paramref name="vector"/>: true if a message was sent,
    /// false if it is pending (masked) or dropped (MSI off, bus mastering off, no such vector).</summary>
    public bool Signal(int vector)
    {
        if (!Enabled || !_config.BusMasterEnabled || vector < 0 || vector >= EnabledVectors) return false;
        var bit = 1u << vector;
        if ((MaskBits & bit) != 0)
        {
            _config.Set(_pendingOffset, 4, PendingBits | bit);
            return false;
        }
        _deliver(Message(vector));
        return true;
    }

    private void SendUnmaskedPending()
    {
        if (!Enabled || !_config.BusMasterEnabled) return;
        var ready = PendingBits & ~MaskBits;
        for (var v = 0; ready != 0 && v < 32; v++)
        {
            var bit = 1u << v;
            if ((ready & bit) == 0) continue;
            ready &= ~bit;
            _config.Set(_pendingOffset, 4, PendingBits & ~bit);
            if (v < EnabledVectors) _deliver(Message(v));
        }
    }
}
