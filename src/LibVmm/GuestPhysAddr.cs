namespace ActorVmm.LibVmm;

/// <summary>A guest-physical address. Never mixed up with a host pointer.</summary>
public readonly record struct GuestPhysAddr(ulong Value) : IComparable<GuestPhysAddr>
{
    public static GuestPhysAddr operator +(GuestPhysAddr a, ulong offset) => new(a.Value + offset);
    public static ulong operator -(GuestPhysAddr a, GuestPhysAddr b) => a.Value - b.Value;
    public int CompareTo(GuestPhysAddr other) => Value.CompareTo(other.Value);
    public override string ToString() => $"0x{Value:X}";
}
